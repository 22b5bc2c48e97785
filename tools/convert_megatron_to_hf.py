#!/usr/bin/env python
"""Convert a megatron_pref checkpoint into a Hugging Face directory.

See docs/conversion.md; `--help` lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pref.convert.cli import megatron_to_hf_main  # noqa: E402

# The guard matters: dist_checkpointing's writer starts multiprocessing helpers that re-import
# __main__.
if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
