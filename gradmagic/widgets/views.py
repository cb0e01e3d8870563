"""``gradmagic.explore``: open the explorer view that fits the model's input.

A flat float vector gets the vector view (:class:`~gradmagic.widgets.explorer.Explorer`)
or, on request, the plane view; a sequence or token ids the sequence view; an
image the image view. Every argument is checked before anything runs; an input
no view serves gets one clear message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets

from gradmagic.core import input_kind, rollback_on_failure
from gradmagic.errors import GradmagicError, InputError
from gradmagic.widgets import explorer_args
from gradmagic.widgets.explorer import Explorer
from gradmagic.widgets.flat_data import flat_features, single_sample
from gradmagic.widgets.view_args import check_labels, check_samples, check_steps, check_view_options, choose_view

__all__ = ["explore"]


def explore(
    model: Any,
    x: Any,
    y: Any = None,
    reference: Callable | None = None,
    reference_grad: Callable | None = None,
    *,
    view: str | None = None,
    labels: Sequence[str] | None = None,
    steps: int = 32,
    baseline: Any = None,
    gradcam_layer: int | str | None = None,
    feature_names: Sequence[str] | None = None,
    points: int = 200,
    training: bool = False,
    max_sliders: int = 6,
    use_ipympl: bool | None = None,
    **unknown: Any,
) -> widgets.VBox:
    """Open the gradient explorer: sliders move the input point, the plots follow.

    The view follows the model's declared input: a flat float vector gets one
    slider per feature (the *vector* view, or with ``view="plane"`` the output
    over two features with the gradient field as arrows); a float sequence
    (T, F) or token ids read by an Embedding get the *sequence* view
    (per-position gradient norms, gradient x input and integrated gradients,
    with a slider along the path from zeros, or zero embeddings, to the
    sample); an image (H, W, C) gets
    the *image* view (a slider along the integrated-gradients path from a
    baseline to the image, SmoothGrad noise, the attribution built up so far).

    Args:
        model: A Keras model with a single input: a flat float vector
            (batch, n_features) (Sequential, Functional or subclassed), or a
            declared (keras.Input) sequence, token ids or image.
        x: Data (n, n_features) or (n,) for one feature: slider ranges come from
            it (padded by 10%), and "reset to sample" picks one of its rows. A
            single sample (n_features,) of a model that declares its inputs is one row.
            For the sequence and image views: the samples to choose from.
        y: Optional targets, one per row of x (vector view). With them the bars show dLoss/dW
            at the point (target: the chosen sample's); without, d(output)/dW.
        view: ``"vector"``, ``"plane"``, ``"sequence"`` or ``"image"``.
            Defaults to None: chosen from the model's input (a flat vector gets
            ``"vector"``; ask for ``"plane"``).
        labels: Sequence view: one label per position (e.g. the tokens), or
            one such list per sample. Defaults to the position numbers.
        steps: Image and sequence views: points on the path from the baseline
            (zeros, or zero embeddings for tokens) to the sample, from 2 to 512.
            Defaults to 32.
        baseline: Image view: where the path starts, as for
            :func:`gradmagic.integrated_gradients` (``None``: zeros, ``"blur"``,
            ``"uniform"`` or an array). Defaults to None.
        gradcam_layer: Image view: a convolutional layer (index or name) whose
            Grad-CAM map at x is shown beside the path's plots. Defaults to None.
        reference: Optional ``f(points) -> values`` drawn dashed beside the model
            (called with an (n, n_features) array), e.g. the analytic curve.
        reference_grad: Optional analytic derivative along the chosen feature
            (an (n, n_features) result is read at that feature's column).
        feature_names: One name per feature (a list, an array, ``df.columns``). Defaults to ``x0``, ``x1``, ...
        points: How many points each curve is drawn with, from 2 to 10000.
            Defaults to 200.
        training: Run the model in training mode (its state is left as it was;
            vector and plane views only). Defaults to False.
        max_sliders: With more features than this, one slider plus a feature
            dropdown. Defaults to 6.
        use_ipympl: True for an interactive ipympl canvas, False for PNG images.
            Defaults to None (ipympl when installed).
        **unknown: Refused with the closest option's name (a typo is an error,
            not a silently ignored keyword).

    Returns:
        An :class:`Explorer` widget; display it (it is the cell's last value).

    Raises:
        GradmagicError: An argument has the wrong type or value (checked before
            any TensorFlow call), the model's input is not a flat float vector,
            x and y do not fit it, or ``reference``/``reference_grad`` fails at
            the first point (a :class:`~gradmagic.errors.ComputeError` chaining
            the original exception). Later failures of the references, on a
            slider move, are shown in the panel.

    Example:
        >>> gm.explore(model, x, y, reference=lambda p: (p - 5) ** 2 / 25,
        ...            reference_grad=lambda p: 2 * (p - 5) / 25)
        >>> gm.explore(model, x, view="plane")
        >>> gm.explore(cnn, images[:8], baseline="blur")
        >>> gm.explore(text_model, ids[:20], labels=tokens[:20])
    """
    explorer_args.check_unknown(unknown)
    chosen = choose_view(model, view)
    check_view_options(
        chosen,
        {
            "labels": labels is not None,
            "steps": steps != 32,
            "baseline": baseline is not None,
            "gradcam_layer": gradcam_layer is not None,
        },
    )
    if chosen != "vector":
        # The other views' own options first, before anything runs.
        explorer_args.check_options(
            model, reference, reference_grad, feature_names, points, training, max_sliders, use_ipympl
        )
        if training and chosen in ("sequence", "image"):
            raise GradmagicError(
                f"Received: training=True with view={chosen!r}. Expected training=False: the {chosen} view walks "
                f"the integrated-gradients path, which runs the model in inference mode. Fix: drop training=True."
            )
        if reference is not None or reference_grad is not None or y is not None:
            raise GradmagicError(
                f"Received: {'y' if y is not None else 'reference'}=... with view={chosen!r}. Expected them only for "
                f"the vector view (curves along one feature, dLoss/dW bars). Fix: drop them, e.g. "
                f"gm.explore(model, x, view={chosen!r})."
            )
        with rollback_on_failure(model):
            return _open_view(
                chosen, model, x, labels, steps, baseline, gradcam_layer, feature_names, training, use_ipympl
            )
    return Explorer(
        model,
        x,
        y,
        reference,
        reference_grad,
        feature_names=feature_names,
        points=points,
        training=training,
        max_sliders=max_sliders,
        use_ipympl=use_ipympl,
    )


def _open_view(
    kind: str,
    model: Any,
    x: Any,
    labels: Any,
    steps: Any,
    baseline: Any,
    gradcam_layer: Any,
    feature_names: Any,
    training: bool,
    use_ipympl: bool | None,
) -> widgets.VBox:
    """Check the data for the plane, sequence or image view and open it."""
    if kind == "plane":
        from gradmagic.widgets.plane import PlaneExplorer

        checked = single_sample(model, explorer_args.check_x(x))
        data = flat_features(model, x, checked)
        if data.shape[1] < 2:
            raise InputError(
                f"Received: x with {data.shape[1]} feature for view='plane'. Expected two features or more: the "
                f"plane view shows the output over two of them. Fix: leave view out for one feature."
            )
        names = explorer_args.check_feature_names(feature_names, data.shape[1])
        return PlaneExplorer(model, data, names, training=training, use_ipympl=use_ipympl)
    data = check_samples(model, x, kind)
    if kind == "sequence":
        from gradmagic.widgets.sequence import SequenceExplorer

        tokens = input_kind(model) == "tokens"
        steps = check_steps(steps)
        return SequenceExplorer(model, data, tokens, check_labels(labels, len(data), data.shape[1]), steps, use_ipympl)
    from gradmagic.widgets.image import ImageExplorer

    return ImageExplorer(model, data, check_steps(steps), baseline, gradcam_layer, use_ipympl=use_ipympl)
