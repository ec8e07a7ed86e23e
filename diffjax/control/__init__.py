"""Control at sampling time: measurement operators, posterior samplers for inverse problems,
particle methods (SMC / Feynman-Kac steering, twisted SMC, best-of-N, noise search) and guidance
by gradients of classifiers and rewards. Closed forms for Gaussian-mixture priors live in
`control.exact`."""
