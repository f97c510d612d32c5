from ..distributed import exit_process
from ._cli import main

exit_process(main())  # sys.exit, or os._exit after a distributed run (see exit_process)
