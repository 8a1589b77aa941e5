"""CodeTune's stages: one package per stage, each exposing a FastStream router."""
