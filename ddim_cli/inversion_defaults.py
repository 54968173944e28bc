"""Inversion's default promises, in a module without torch so that ``ddim invert --help`` can show
them without loading the library."""

EXACT_TOL = 1 / 255  # reconstruction RMS on [-1, 1] of half a uint8 level (a level is 2/255)
# Adam iterations per step at most. The paper's 10 suits in-distribution images; on smooth digits unlike the
# quickstart's training data, 10 left a mean reconstruction MSE of 5e-3 at guidance 3 and 30 reach 4e-4.
NULL_TEXT_INNER_STEPS = 30
