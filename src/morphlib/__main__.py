from morphlib.cli import main

main()
