"""The client role: `python -m grid_ipfs.client submit --api A --model M.keras --rounds R`.

The client owns a job. It adds the model and its initial weights to IPFS, writes the genesis block
of the job's chain, announces the job, waits for workers to join, and then for each round: announces
the global weights CID with a deadline, collects signed updates, checks each one (shapes, dtypes,
finite values), aggregates with FedAvg weighted by `num_examples` or the job's rule (updates sorted by
worker id, float64 sums: anyone can recompute it bit for bit), adds the new global weights and appends a
chain block.

Beyond plain FedAvg a job can ask for a robust rule (`median`, `krum`, ...), DP-FedAvg (`dp-fedavg`:
clipped deltas from the previous global weights plus seeded Gaussian noise), FedProx on the workers
(`proximal_mu` in the job config) and an acceptance rule (`accept`, e.g. `val_accuracy>=0.6`): a round
whose aggregate fails the rule is appended as a block marked `accepted: 0.0` (so the chain shows what
was turned down and why) and tried again, up to `accept_retries` times, before the job fails. With
`miners` (competing aggregators, `python -m grid_ipfs.miner`), each round's aggregate is a candidate
that rivals may beat: the best one that clears the rule on the client's data wins (`grid_ipfs.contest`).

Round orchestration lives here; what a rule computes lives in `grid_ipfs.strategies`, the block
format in `grid_ipfs.chain`. Progress goes to `ClientCallback` hooks (Keras style): the CLI plugs in
a rich display, tests and notebooks plug in their own.

- `job.py`: what the caller hands in and gets back (`JobSpec`, `JobResult`, `JobFailed`, the hooks);
- `core.py`: `Client`, the event loop of the rounds;
- `state.py`: a running job (`JobRun`) and its newest accepted block (`Accepted`);
- `inbox.py`: the job topic drained (joins, proposals, endorsements, drops);
- `collect.py`: which updates count, fetching them, outlier screening;
- `blocks.py`: a round's block fields, the callbacks' `ext`, the metrics;
- `pofl.py`: the owner's side of the miners' contest;
- `tensorboard.py`: the `TensorBoard` callback (each block's scalars, as `chain tensorboard` writes them);
- `__main__.py`: the command line (`submit`, `resume`, `verify`).
"""

from .core import Client
from .job import SECURE_RULES, ClientCallback, InvalidJobSpec, JobFailed, JobResult, JobSpec, RoundResult
from .tensorboard import TensorBoard

__all__ = ["Client", "ClientCallback", "InvalidJobSpec", "JobFailed", "JobResult", "JobSpec", "RoundResult",
           "SECURE_RULES", "TensorBoard"]
