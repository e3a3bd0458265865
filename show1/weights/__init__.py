"""The Show-1 weights on disk. What `setup()` reads: where each component's files are and what
they are called (layout), reading them into networks (loading) and the manifest of a complete
folder, checked at every start (manifest). What prepares a folder before serving, run by
script/download-weights and script/verify-weights, is in the preparation subpackage.

Which components exist, and in which repo folder, is declared in show1.components.
"""
