"""Print every registered preference loss on a few hand-made pairs.

    python examples/losses_demo.py
"""

import torch

from megatron_pref.losses import LOSSES, LossConfig, PairStats, compute_loss


def main() -> None:
    # Three pairs: clearly preferred, a near-tie, and an inverted pair.
    rejected_tokens = [[-2.0, -3.0], [-1.0, -1.5, -0.5], [-0.2, -0.3, -0.1, -0.4]]
    stats = PairStats(
        chosen_logps=torch.tensor([-4.0, -6.0, -9.0]),
        rejected_logps=torch.tensor([sum(x) for x in rejected_tokens]),
        chosen_lengths=torch.tensor([4.0, 4.0, 3.0]),
        rejected_lengths=torch.tensor([float(len(x)) for x in rejected_tokens]),
        ref_chosen_logps=torch.tensor([-6.0, -6.5, -8.0]),
        ref_rejected_logps=torch.tensor([-3.0, -3.2, -2.0]),
        rejected_token_logps=torch.tensor([v for x in rejected_tokens for v in x]),
    )
    config = LossConfig()
    num_pairs = stats.chosen_logps.numel()
    print(f"{'loss':<6} {'mean loss':>10}  per-pair losses")
    for name in LOSSES:
        out = compute_loss(name, stats, config)
        pairs = ", ".join(f"{v:8.4f}" for v in out.pair_losses.tolist())
        print(f"{name:<6} {out.loss_sum.item() / num_pairs:10.4f}  [{pairs}]")


if __name__ == "__main__":
    main()
