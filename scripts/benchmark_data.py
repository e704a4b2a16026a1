from unet_pl.cli.benchmark_data import main

main()
