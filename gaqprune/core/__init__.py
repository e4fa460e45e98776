"""The pruning method itself: what a unit owns, layer importance, allocation, Taylor scores, the plan, surgery and
the least-squares refit. Pure computation on a model in memory: no files, no command line, no Lightning."""
