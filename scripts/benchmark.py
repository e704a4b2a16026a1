from unet_pl.cli.benchmark import main

main()
