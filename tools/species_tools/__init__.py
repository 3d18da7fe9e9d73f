"""The project's command-line tools that run outside the image: the SageMaker launcher
(`species_tools.launcher`, `scripts/run_job.py`) and the iNaturalist collector
(`species_tools.collector`, `scripts/collect_inaturalist.py`), with what both share in
`species_tools.aws`."""
