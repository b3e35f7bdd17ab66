from fedfuse.cli import main

main()
