"""--inner-optimizer applies to the unrolled MAML inner loop only: elsewhere it would do nothing, so it is refused."""

import pytest

import maml
import meta_pretrain


def halved(tensor, grad, lr, state):
    return tensor - 0.5 * lr * grad


@pytest.mark.parametrize("argv,where", [(["--method", "mtl"], "--method mtl"),
                                        (["--inner-loop", "implicit"], "--inner-loop implicit")])
def test_an_inner_optimizer_with_no_unrolled_inner_loop_is_refused(argv, where, monkeypatch):
    monkeypatch.setitem(maml.INNER_OPTIMIZERS, "halved", halved)
    args = meta_pretrain.build_parser().parse_args([*argv, "--inner-optimizer", "halved"])
    with pytest.raises(ValueError, match=f"--inner-optimizer halved sets the unrolled .* {where} has none"):
        meta_pretrain.check_args(args)
    meta_pretrain.check_args(meta_pretrain.build_parser().parse_args(argv))   # the default rule: accepted
    meta_pretrain.check_args(meta_pretrain.build_parser().parse_args(["--inner-optimizer", "halved"]))
