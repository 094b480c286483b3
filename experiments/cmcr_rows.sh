# The C-MCR ablation rows as `polyalign connect` overrides, shared by experiments/cmcr.sh and cmcr4.sh (sourced).
# row_overrides ROW: sets the array `extra` to the row's overrides; an unknown row stops the script.
row_overrides() {
  case $1 in
    full) extra=() ;;
    nearest_pairs) extra=(method.pseudo_pairs=nearest) ;;  # no consistency: the raw nearest memory row
    random_pairs) extra=(method.pseudo_pairs=random) ;;    # random memory rows (a harmful ablation)
    no_noise) extra=(method.noise_var=0) ;;
    noise_dim) extra=(method.noise_scale=dim) ;;           # σ² · 512 / d per space
    no_intra) extra=(method.intra_weight=0) ;;
    no_memories) extra=(method.memories=false) ;;          # the shared modality only
    anchor_x) extra=(method.mode=anchor_x) ;;
    *) echo "unknown row $1 (full nearest_pairs random_pairs no_noise noise_dim no_intra no_memories anchor_x)" >&2
       exit 2 ;;
  esac
}
