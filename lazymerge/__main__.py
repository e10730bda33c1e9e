from lazymerge.cli import main

main()
