"""rollfleet: asynchronous, disaggregated RL post-training of LLMs on Kubernetes.

The core package holds what more than one service needs: the RLJob spec, the plan, the
bus protocol, algorithms, models and tasks. Services live in their own packages
(rollfleet_rollout, rollfleet_trainer, rollfleet_reward, rollfleet_env) and import this one.
"""

__version__ = "0.1.0"
