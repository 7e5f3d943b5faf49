"""Multi-agent RL: games whose players take turns, some of them the policy being trained.

* :mod:`.coordinator`: a :class:`~.coordinator.TurnBasedGame` (the rules), the
  :class:`~.coordinator.GameCoordinator` that makes each player wait for its turn (and plays the
  frozen players' turns itself) and :class:`~.coordinator.PlayerEnv`, one RL ``Env`` per
  trained player, so a group's trajectories are the trained players of several games and
  their per-player rewards are compared for advantages.
* :mod:`.guess_number`: the policy guesses a secret number; the environment answers higher/lower.
* :mod:`.twenty_questions`: the policy asks yes/no questions; a frozen sampler of the base
  model, told the secret, answers them.
* :mod:`.tic_tac_toe`: self-play, both sides played by the same policy.
"""
