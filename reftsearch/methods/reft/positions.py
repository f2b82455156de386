"""Which tokens an intervention edits: pyreft's ``f<p>+l<s>`` position grammar.

For a prompt of ``n`` tokens (BOS included) the first ``p`` and the last ``s`` tokens are
intervened, each count capped at ``n // 2`` so the two never overlap. Untied configs have one
intervention group for the first tokens and one for the last; tied configs (and configs with
only one of the two) have a single group over all of them. Every group is padded to a common
width with ``-1``, a position the hooks skip (pyreft sends it to a masked pad token instead,
which has the same effect on every real token).
"""

from __future__ import annotations

import torch

from reftsearch.methods.reft.config import num_groups

PAD_POSITION = -1


def intervention_locations(
    prompt_lengths: torch.Tensor,
    prefix: int,
    suffix: int,
    tied: bool,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token indices to intervene on, shape ``[groups, batch, width]``, ``-1`` = none.

    ``prompt_lengths[b]`` is the number of prompt tokens of row ``b``; ``offsets[b]`` is where
    its prompt starts in the padded batch (the number of left-padding tokens, 0 with right
    padding): positions must follow the padding side or shorter rows are silently edited at
    the wrong tokens.
    """
    lengths = prompt_lengths.long()
    device = lengths.device  # the batch's: every tensor made here goes there too
    cap = lengths // 2
    first_n = cap.clamp(max=prefix)
    last_n = cap.clamp(max=suffix)

    first = torch.arange(prefix, device=device).expand(len(lengths), prefix)
    first = torch.where(first < first_n[:, None], first, PAD_POSITION)
    steps = torch.arange(suffix, device=device).expand(len(lengths), suffix)
    last = torch.where(
        steps < last_n[:, None], lengths[:, None] - last_n[:, None] + steps, PAD_POSITION
    )

    if num_groups(prefix, suffix, tied) == 1:
        groups = torch.cat([first, last], dim=1)[None]
    else:
        width = max(prefix, suffix)
        groups = torch.stack([_pad_to(first, width), _pad_to(last, width)])

    if offsets is not None:
        groups = torch.where(groups >= 0, groups + offsets.long()[None, :, None], PAD_POSITION)
    return groups


def unedited_prefix(prompt_lengths: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor:
    """How many leading tokens of each prompt no intervention edits (read off
    ``intervention_locations``, caps included), at most ``prompt_length - 1``: in a causal
    decoder their hidden states, keys and values are the frozen model's at every layer, and
    the last prompt token (whose output predicts the response) is always recomputed."""
    lengths = prompt_lengths.long()
    (positions,) = intervention_locations(lengths, prefix, suffix, tied=True)  # one group
    edited = torch.where(positions >= 0, positions, lengths[:, None])
    first_edited = torch.cat([edited, lengths[:, None]], dim=1).amin(dim=1)
    return torch.minimum(first_edited, lengths - 1).clamp(min=0)


def _pad_to(positions: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - positions.shape[1]
    return torch.nn.functional.pad(positions, (0, missing), value=PAD_POSITION)
