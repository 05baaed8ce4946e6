from medvlm.data_curation.loading import load_source  # noqa: F401
