"""Driver for the two-process test (tests/test_rl.py): 04_rl_multiturn.main under torchrun with
test_rl.varied_reward in place of the real reward, whose tiny-model values are all 0 (no gradient
would then cross the processes)."""
import importlib
import sys

rl = importlib.import_module("04_rl_multiturn")


def varied_reward(turn, truth, items, args):
    r = float(sum(turn["completion_ids"]) % 5)
    return {"format": 0.0, "recommend": r, "preference": 0.0, "reward": r}


if __name__ == "__main__":
    rl.turn_reward = varied_reward
    rl.main(sys.argv[1:])
