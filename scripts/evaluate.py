from unet_pl.cli.evaluate import main

main()
