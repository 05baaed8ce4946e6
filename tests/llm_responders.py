"""Stand-in model replies shared by the tests of QA generation, the judge and their OpenAI-server
consumers: rules the tests know, so each outcome can be asserted."""

from __future__ import annotations

import json
import re

from medvlm.records import make_record


def caption_records(n: int = 6) -> list[dict]:
    """n ROCOv2-style records (caption + CUIs) and one MedPix-style case, as the loaders emit them."""
    recs = [
        make_record(
            id=f"rocov2-img{i}", image=f"images/img{i}.png", question="Describe the image.",
            answer=f"Axial CT of the chest showing a {i + 1} cm nodule in the right upper lobe (case {i}).",
            answer_type="open", source="rocov2", split="train", group_id=f"img{i}", modality="CT",
            meta={"image_id": f"img{i}", "cuis": ["C0040405", "C0034079"],
                  "concepts": ["X-Ray Computed Tomography", "Lung Nodule"]},
        )
        for i in range(n)
    ]
    recs.append(make_record(
        id="medpix-MPX1", image="images/MPX1.png", question="Describe the image.",
        answer="T2 MRI shows a hyperintense lesion in the left temporal lobe.", answer_type="open",
        source="medpix", split="test", group_id="MPX1", modality="MRI", body_part="Brain",
        meta={"u_id": "MPX1", "history": "Seizures for two weeks.", "diagnosis": "Herpes encephalitis",
              "disease_discussion": "x" * 2000},
    ))
    return recs


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def qa_responder(prompt: str, request: dict) -> str:
    """A well-behaved model: n questions of the asked kind, built from the caption."""
    kind = "image" if 'Set "kind" to "image"' in prompt else "literature"
    n = int(re.search(r"Write (\d+)", prompt).group(1))
    caption = re.search(r"Caption: (.*)", prompt).group(1)
    qs = [{"question": f"Is there a nodule ({kind} {j}) per: {caption[:40]}?", "answer": "Yes.",
           "answer_type": "closed", "kind": kind} for j in range(n - 1)]
    qs.append({"question": f"Which modality ({kind}) is used?", "answer": "CT", "answer_type": "open", "kind": kind})
    return json.dumps({"questions": qs})


def judge_responder(prompt: str, request: dict) -> str:
    """Scores by a rule the tests know: predictions containing the reference get 9/yes, else 2/no."""
    ref = re.search(r"Reference answer: (.*)", prompt).group(1).lower()
    pred = re.search(r"Model answer: (.*)", prompt).group(1).lower()
    if "hepatic" in pred:
        return json.dumps({"score": 8, "verdict": "yes", "reason": "synonym"})
    good = ref in pred
    return json.dumps({"score": 9 if good else 2, "verdict": "yes" if good else "no", "reason": "rule"})
