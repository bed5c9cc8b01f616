"""preftune's built-in plugins. Each module registers itself exactly as a third party's would."""
