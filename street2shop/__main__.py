from street2shop.cli import main
import sys
sys.exit(main())
