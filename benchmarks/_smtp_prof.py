import gc, sys, tempfile, time, asyncio
from pathlib import Path
import uvloop
sys.path.insert(0, str(Path(__file__).parent))
from bench_core import prepare, cpu_stages, receiver, eobblast_config, smtp_stage
with tempfile.TemporaryDirectory() as tmp:
    setup = prepare(Path(tmp), 2000)
    gc.collect(); gc.freeze()
    built = cpu_stages(setup, 2000)
    env = built.envelopes * 15
    with receiver(setup.pki, Path(tmp)) as rx:
        config = eobblast_config(setup, rx.port, 64, 16)
        print("START", flush=True)
        r = uvloop.run(smtp_stage(config, env, rx))
        print(r.detail, r.count if hasattr(r,'count') else '', flush=True)
