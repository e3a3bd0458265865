"""The Show-1 weights on disk: where each component's files are and what they are called
(layout), reading them into networks (loading), the manifest of a complete folder (manifest), and
`script/download-weights`: the sources it fetches from (sources), storing checkpoints as
safetensors in their serving dtypes (conversion) and the whole job (download).

Which components exist, and in which repo folder, is declared in show1.components.
"""
