from della_cli.cli import main

main()
