"""A spec against its model: layers it lacks, ranks past its hidden size, inputs longer
than its positions.

``reftsearch validate`` runs ``check_model_fit`` on the model's config alone
(``models.sources.read_shape``: no weights, no torch); ``study.prepare`` runs the same
checks on the loaded model.
"""

from __future__ import annotations

from reftsearch.errors import SpecError
from reftsearch.methods.reft.constraints import check_model_space
from reftsearch.models.sources import ModelLoadError, ModelShape, read_shape
from reftsearch.spec.study_file import StudySpec, TaskSpec


def read_model_shape(spec: StudySpec) -> ModelShape:
    """The spec's model's shape, from its config; a missing model is a spec error."""
    try:
        return read_shape(spec.model.path)
    except ModelLoadError as err:
        raise SpecError("model.path", str(err)) from None


def check_model_fit(spec: StudySpec, shape: ModelShape) -> None:
    """Refuse layers the model lacks, ranks at or past its hidden size, and inputs longer
    than its positions (SpecError naming the key)."""
    if spec.method == "reft" and shape.num_layers and shape.hidden_size:
        check_model_space(spec.space, shape.num_layers, shape.hidden_size)
    check_lengths(spec.task, shape.max_positions)


def check_lengths(task: TaskSpec, max_positions: int | None) -> None:
    """A training input holds up to ``max_length`` tokens; a generated answer follows a
    prompt of up to ``max_length`` with ``max_new_tokens`` more: all within the positions
    the model has (past them absolute position embeddings index out of range)."""
    if max_positions is None:
        return
    if task.max_length > max_positions:
        raise SpecError(
            "task.max_length",
            f"must be <= {max_positions}, the positions this model takes, got {task.max_length}",
        )
    if task.kind == "generation" and task.max_length + task.max_new_tokens > max_positions:
        raise SpecError(
            "task.max_new_tokens",
            f"must be <= {max_positions - task.max_length}: a prompt of up to task.max_length "
            f"({task.max_length}) tokens and the answer must fit the model's {max_positions} "
            f"positions, got {task.max_new_tokens}",
        )
