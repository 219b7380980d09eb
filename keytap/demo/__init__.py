"""The demo capture and its throwaway pod network."""
