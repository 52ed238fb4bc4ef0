"""Writes the three small byte-level token files of docs/recipe.md (tiny preset, vocabulary 256).

Run from the repository root:  python3 scripts/recipe_corpora.py OUT_DIR
Writes OUT_DIR/pretrain.json (general English), OUT_DIR/finetune.json (clinical notes) and
OUT_DIR/prompt.json (question/answer lines): JSON arrays of sequences of byte values. The text is
fixed below, so the files are the same on every machine.
"""
import json
import os
import sys

PRETRAIN = """The river runs past the old mill and under the stone bridge. In spring the water is high
and brown; in summer it is slow and clear, and children wade across at the ford. The miller's
house stands on the north bank. Its garden slopes down to the water, with apple trees, a row of
beans and a bench where the miller sits in the evening to watch the swallows. Across the river
the fields rise to a low hill crowned with beech trees. Sheep graze there, and a footpath climbs
from the bridge to the top, where on a clear day you can see the sea. The village lies a mile
downstream: a church, a shop, a school, two inns and perhaps forty houses along one street.
""".replace("\n", " ")

FINETUNE = """Patient presents with fever and cough for three days. Blood pressure is normal. The
chest is clear on examination. Plan: rest, fluids and review in one week. Patient reports
headache and nausea since the morning. Temperature is normal. No rash. Plan: bloods and review
tomorrow. Patient has a history of asthma and reports wheeze at night. Peak flow is reduced.
Plan: inhaler review and follow up in two weeks.
""".replace("\n", " ")

PROMPT = """Q: what is the dose? A: one tablet twice a day. Q: when is the review? A: in one week.
Q: is the chest clear? A: yes, the chest is clear. Q: what is the plan? A: rest and fluids.
""".replace("\n", " ")


def sequences(text, repeats):
    ids = list((text * repeats).encode("ascii"))
    return [ids]


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, text, repeats in [("pretrain", PRETRAIN, 6), ("finetune", FINETUNE, 6), ("prompt", PROMPT, 10)]:
        seqs = sequences(text, repeats)
        with open(f"{out}/{name}.json", "w") as f:
            json.dump(seqs, f)
        print(name, sum(len(s) for s in seqs), "tokens")


if __name__ == "__main__":
    main()
