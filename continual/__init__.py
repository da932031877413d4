"""The suite's library: continual-learning methods (methods/) on one training loop (training/).

The user-facing scripts (train_task1.py, train_teracon_t2.py … t6.py, compare.py, evaluate.py, predict.py,
prepare_data.py) and the model, data and utility modules stay at the repository root; developer tools
(benchmarks, the replay check, the synthetic benchmark's generator, figures) live in tools/.
"""
