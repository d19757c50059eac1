"""Oracle for lmms-ft's LengthGroupedSampler: runs transformers' own
`get_length_grouped_indices` with the random permutation replaced by the one lmms-ft drew
(ChaCha-based, so torch's generator cannot reproduce it). Everything after the permutation
(megabatch size default, stable descending sort, longest-first swap) is transformers' code.

stdin: JSON list of {"lengths": [...], "batch_size": n, "perm": [...], "mega_batch_mult": n|null}
stdout: JSON list of flat index orders, one per case.
"""
import json
import sys

import torch
import transformers.trainer_pt_utils as tpu


def main():
    cases = json.load(sys.stdin)
    out = []
    real_randperm = torch.randperm
    for case in cases:
        perm = torch.tensor(case["perm"], dtype=torch.long)
        assert sorted(case["perm"]) == list(range(len(case["lengths"])))

        def fake_randperm(n, generator=None, **kw):
            assert n == len(perm)
            return perm.clone()

        torch.randperm = fake_randperm
        try:
            order = tpu.get_length_grouped_indices(
                case["lengths"], case["batch_size"], mega_batch_mult=case.get("mega_batch_mult")
            )
        finally:
            torch.randperm = real_randperm
        out.append([int(i) for i in order])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
