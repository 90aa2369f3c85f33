"""tools/profile_training.py as a real script: the time of each phase and model part of a few training
iterations, for a model whose extra training phase (CLIP-ReID's prompt learning) is stood in for."""
import json

import pytest

from tests.fixtures import CLIPREID, SVPR, check_ok, run_script, tiny


@pytest.mark.parametrize("config, part", [(CLIPREID, "forward/clip.visual.transformer"),
                                          (SVPR, "forward/backbone.visual.transformer")])
def test_profile_reports_every_phase_and_the_model_parts(synth_root, tmp_path, config, part):
    result = run_script(["tools/profile_training.py", "--config_file", config, "--iters", "2",
                         *tiny(synth_root, str(tmp_path))], env={"OMP_NUM_THREADS": "1"})
    check_ok(result)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["iters"] == 2 and report["wall_per_iter"] > 0
    per_iter = report["per_iter"]
    for key in ("data/loader wait", "step/forward, loss, backward, optimiser", "step/optimiser", part):
        assert per_iter[key] > 0, key
    # The parts are inside the step: their forward and backward times never exceed it.
    inside = sum(value for key, value in per_iter.items() if key.split("/")[0] in ("forward", "backward"))
    assert inside <= per_iter["step/forward, loss, backward, optimiser"]
