from unet_pl.cli.train import main
main()
