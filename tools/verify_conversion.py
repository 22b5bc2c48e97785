#!/usr/bin/env python
"""Compare the logits of a HF model and its converted megatron-core checkpoint.

See docs/conversion.md; `--help` lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pref.convert.cli import verify_main  # noqa: E402

# The guard matters: dist_checkpointing's writer starts multiprocessing helpers that re-import
# __main__.
if __name__ == "__main__":
    sys.exit(verify_main())
