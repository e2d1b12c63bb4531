"""The route callers use, as a library: its stages (`stages.RankingRoute`), the item-embedding cache (`cache`,
`item_keys`), its metrics, and catalogue warming (`warming`)."""
