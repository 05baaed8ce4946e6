"""The source registry: dataset name → loader, imported lazily (one module per dataset).

An entry ``"package.module"`` names a loader module with ``iter_records(ctx)``;
``"package.module:function"`` names a full loader ``function(path, split, **options)`` that
returns unified records itself (the synthetic phantom dataset). Adding a dataset is one new
module plus one line here.
"""

from __future__ import annotations

SOURCES: dict[str, str] = {
    "slake": "medvlm.data_curation.sources.slake",
    "rocov2": "medvlm.data_curation.sources.rocov2",
    "medpix": "medvlm.data_curation.sources.medpix",
    "medpix_shortqa": "medvlm.data_curation.sources.hf_qa",
    "roco_qa": "medvlm.data_curation.sources.hf_qa",
    "pmc_vqa": "medvlm.data_curation.sources.pmc_vqa",
    "vqa_rad": "medvlm.data_curation.sources.vqa_rad",
    "llava_med": "medvlm.data_curation.sources.llava_med",
    "cxr_paraphrase": "medvlm.data_curation.sources.cxr_paraphrase",
    "phantom": "medvlm.data_curation.phantom:load_phantom_source",
}
