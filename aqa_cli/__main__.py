from aqa_cli.cli import main

main()
