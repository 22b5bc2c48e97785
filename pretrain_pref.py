"""Preference training on megatron-core: ``torchrun --nproc-per-node N pretrain_pref.py --loss spo ...``.

With no data flags it trains a tiny GPT on the bundled demo task (CPU/gloo without a GPU).
"""

import sys
import warnings


def main(argv=None) -> int:
    # Quiet the import-time notices of optional GPU packages before megatron-core loads.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megatron_pref.arguments import parse_run_config
    from megatron_pref.errors import UserError

    try:
        run = parse_run_config(argv)
        from megatron_pref.stopping import one_line_stops
        from megatron_pref.training import train

        with one_line_stops(run):  # Ctrl-C, SIGTERM, a dead rank: one line, no traceback
            train(run)
    except UserError as exc:  # bad flags, files, data or checkpoints; anything else is a bug: traceback
        return _fail(exc, "error")
    except Exception as exc:
        from megatron_pref.engine import NonFiniteLoss

        if isinstance(exc, NonFiniteLoss):  # from the globally reduced loss: every rank stops alike
            return _fail(exc, "stopped", code=3, same_on_every_rank=True)
        raise
    finally:
        from megatron_pref import parallel

        try:
            parallel.destroy()
        except Exception:
            pass
    return 0


def _fail(exc, label, code=2, same_on_every_rank=None) -> int:
    """One line on stderr from the rank that fails (see cli_errors.report_error).

    Errors found before the process groups are set up come from the checks of flags, files and
    checkpoints that every rank makes alike: printed once. Later ones may concern some ranks
    only (e.g. "local rank 1 has no GPU"): printed as ``[rank N] error: ...``."""
    from megatron_pref.cli_errors import report_error

    return report_error(exc, label, code, same_on_every_rank)


# The guard matters: dist_checkpointing's async writer starts a multiprocessing Manager that
# re-imports __main__; without it a save hangs.
if __name__ == "__main__":
    sys.exit(main())
