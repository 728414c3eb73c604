from bnexp.entry import main

main()
