"""`python -m trainer train --stage ...`, so `accelerate launch -m trainer train ...` (or torchrun) runs exactly the
code of `moe-vlm train` (same parser, same error handling) on every process."""

import sys

from moe_vlm_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
