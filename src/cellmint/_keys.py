"""Every result key the tools write and the plots read, named once (squidpy's ``Key`` constants habit).

``cm.tl.annotate`` writes per label level ``obs``/``obsm`` entries named from its ``key_added`` and the
level, and its parameters (the levels among them) in ``uns[key_added]["annotation"]``;
``cm.tl.predict_perturbation`` writes ``uns[key_added]`` and a few ``obs``/``var`` columns; the table of
``cm.tl.evaluate_perturbation`` (and its :func:`~cellmint.tl.perturbation_summary`) has a ``method``
column and ``<metric>_scaled`` scores. The plots build the same names with the same functions, so they
never parse a key string nor guess which ``uns`` entry to read. A floor module: it imports nothing.
"""

from __future__ import annotations

__all__ = ["Key"]


def _per_level(suffix: str) -> staticmethod:
    """The key of one label level of an annotation: ``{key_added}_{level}{suffix}``."""

    def key(key_added: str, level: str) -> str:
        return f"{key_added}_{level}{suffix}"

    return staticmethod(key)


def _suffixed(suffix: str) -> staticmethod:
    """A metric's column with ``suffix``: ``{metric}{suffix}``."""

    def column(metric: str) -> str:
        return f"{metric}{suffix}"

    return staticmethod(column)


class Key:
    """Result keys, grouped by the AnnData attribute (or table) that holds them."""

    class obs:
        """``obs`` columns of ``cm.tl.annotate`` (per level) and ``cm.tl.predict_perturbation``."""

        label = _per_level("")
        confidence = _per_level("_confidence")
        margin = _per_level("_margin")
        unknown = _per_level("_unknown")
        unknown_reason = _per_level("_unknown_reason")
        prediction_set = _per_level("_set")
        set_size = _per_level("_set_size")
        majority = _per_level("_majority")

        @staticmethod
        def distance(key_added: str) -> str:
            """The open-set score (the cell's and its nearest query cells' median relative distance)."""
            return f"{key_added}_distance"

        @staticmethod
        def cell_distance(key_added: str) -> str:
            return f"{key_added}_cell_distance"

        #: predicted cells (``True``) or their own control cells (``False``)
        is_predicted = "is_predicted"
        #: the control cell each prediction was made from
        source_cell = "source_cell"

    class obsm:
        """``obsm`` entries of ``cm.tl.annotate``, and the embeddings the plots draw."""

        proba = _per_level("_proba")

        @staticmethod
        def projection(key_added: str, name: str) -> str:
            """A model embedding projected by annotate (``name`` with or without its ``X_``)."""
            return f"X_{key_added}_{name.removeprefix('X_')}"

        @staticmethod
        def basis(basis: str) -> str:
            return f"X_{basis}"

    class var:
        """``var`` columns of ``cm.tl.predict_perturbation``."""

        prediction_source = "prediction_source"

    class uns:
        """``uns`` entries: the defaults of ``key_added`` and the names inside ``uns[key_added]``."""

        #: ``key_added`` of ``cm.tl.annotate`` by default
        annotate = "cellmint"
        #: ``key_added`` of ``cm.tl.predict_perturbation`` by default
        prediction = "cellmint_perturbation"
        #: ``uns[key_added][annotation]``: annotate's parameters and counts
        annotation = "annotation"
        #: ``uns[key_added][annotation][levels]``: the label levels annotated, coarse to fine
        levels = "levels"
        #: ``uns[key_added][perturbations]``: the perturbations predicted
        perturbations = "perturbations"

    class table:
        """Columns of ``cm.tl.evaluate_perturbation``'s table and of its summary."""

        method = "method"
        context = "context"
        perturbation = "perturbation"
        #: the number of rows a summary pooled
        n = "n"
        #: the split-half replicate (the ceiling) among the methods
        replicate = "replicate"

        scaled = _suffixed("_scaled")

        scaled_low = _suffixed("_scaled_low")

        scaled_high = _suffixed("_scaled_high")

        #: a metric normalised to the ``normalize_to`` baseline
        score = _suffixed("_score")
