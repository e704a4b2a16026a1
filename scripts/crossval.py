from unet_pl.cli.crossval import main

main()
