"""Recommendation: candidate-list metrics (`metrics`), scoring a policy on prompts (`scoring`), the
`results.json` schema (`results`), statistics (`stats`), the comparison report (`report`) and the
callback that runs the evaluation inside fit and test (`callback`).
"""
