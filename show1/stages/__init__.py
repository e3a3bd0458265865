"""The cascade's stages, one module per stage id (show1.components.STAGES), each with a `run`
function that takes the stage's components by name."""
