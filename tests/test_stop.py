"""A batch scheduler stops training with SIGTERM (issue 32): the run saves where it was, says how to resume, and
exits with 143 within seconds; the resumed run continues from that step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from cerberus_histo.data.synthetic import write_tiles

SCRIPT = textwrap.dedent("""
    import sys
    from cerberus_histo.train.config import TrainConfig
    from cerberus_histo.train.datamodule import Source
    from cerberus_histo.train.run import train

    cfg = TrainConfig(batch_size=2, max_steps=int(sys.argv[1]), val_every=1000, model={"encoder": "tiny", "patch_shape": 64})
    s = train([Source("data", ("nuclei-inst",))], "run", cfg, fold=1, resume=sys.argv[2] if len(sys.argv) > 2 else None)
    print("trained to", s["steps"])
""")


def test_sigterm_saves_says_how_to_resume_and_exits_143(tmp_path):
    write_tiles(tmp_path / "data", 6, 128, tasks=("nuclei",), name="n", progress=False)
    (tmp_path / "t.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "t.py", "100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    csv = tmp_path / "run" / "csv"
    deadline = time.time() + 120
    while time.time() < deadline and not any(csv.rglob("metrics.csv")):  # training has started
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 15
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "--resume" in err and "Traceback" not in err
    step = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert f"at step {step}:" in err and step > 0
    more = subprocess.run([sys.executable, "t.py", str(step + 3), "last"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    assert more.stdout.strip().endswith(f"trained to {step + 3}")
