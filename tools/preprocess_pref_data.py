#!/usr/bin/env python
"""Tokenise preference pairs into a megatron-core IndexedDataset plus a pair index.

Example::

    python tools/preprocess_pref_data.py --input data/train.jsonl \
        --output-prefix data/train --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model path/to/tokenizer_dir --workers 8 --seq-length 4096 \
        --max-prompt-length 1024

See docs/data.md for formats, flags and the output layout.
"""
import os
import sys

try:
    from megatron_pref.cli_errors import refuse_torchrun
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_pref.cli_errors import refuse_torchrun

if __name__ == "__main__":
    refuse_torchrun("preprocess_pref_data.py", "--workers N tokenises in parallel")
    from megatron_pref.data.preprocess import main

    sys.exit(main())
