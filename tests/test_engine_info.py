"""What a controller sees: the queue's KV need and the arrivals so far, counted by hand."""

from morphlib.engine import EngineConfig, SamplingParams, Simulator, TableStepTime


def test_step_info_counts_queue_need_and_arrivals():
    sim = Simulator("shape:smollm2-135m", EngineConfig(kv_blocks=8, block_size=16, max_num_seqs=2, max_model_len=128,
                                                        max_num_batched_tokens=64, cuda_graphs=False),
                    TableStepTime({1: 0.01}))
    for n, g in ((20, 5), (33, 4), (16, 1)):
        sim.add_request(list(range(n)), SamplingParams(max_tokens=g, ignore_eos=True))
    info = sim.info()
    # nothing scheduled yet: every request waits; 20 -> 2 blocks, 33 -> 3, 16 -> 1
    assert (info.waiting, info.waiting_blocks, info.kv_used) == (3, 6, 0)
    # complete lengths: 25 -> 2, 37 -> 3, 17 -> 2 blocks
    assert (info.arrived_requests, info.arrived_blocks) == (3, 7)
    assert info.demand == 6 / 8
    sim.step()  # two requests admitted, their prompts in 2 + 3 blocks; the third waits (max_num_seqs=2)
    info = sim.info()
    assert info.waiting == 1 and info.waiting_blocks == 1 and info.kv_used == 5
    assert info.demand == (5 + 1) / 8 and info.kv_usage == 5 / 8
    sim.reset()
    info = sim.info()
    assert (info.arrived_requests, info.arrived_blocks, info.waiting_blocks) == (0, 0, 0)
