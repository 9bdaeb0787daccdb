"""Evaluation: victims trained on protected data, scored on clean data.

evaluate (the entry point), eval_config, pairs (victim data), classifier + cifar_nets and
clip_victim (the victims), defences, scores, report, baselines (the literature's calibration
perturbations).
"""
