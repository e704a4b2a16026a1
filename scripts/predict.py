from unet_pl.cli.predict import main

main()
