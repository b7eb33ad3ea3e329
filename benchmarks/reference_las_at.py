# ruff: noqa: ANN001, ANN201, N802, N803  (a transcription keeps the authors' names and untyped signatures)
"""The authors' LAS-PGD-AT step, transcribed for the CPU: what ``tests/test_las_at.py`` compares against.

Source: github.com/jiaxiaojunQAQ/LAS-AT, ``LAS_PGD_AT/LAS_AT_train_cifar10.py`` (cited L<n>) and
``LAS_PGD_AT/utils.py`` (``clamp``, mean 0 / std 1, L22-31). Transcribed as written, with these changes
only: ``.cuda()`` dropped; the ``args`` namespace passed in (``Args``); ``print``/tensorboard lines dropped;
``Variable`` as a plain tensor; ``torch.randint(k, k + 1, (3, 1, 1))`` (L332) written as the constant k
it is. That call draws from the CPU generator, which on the authors' GPU touches none of the CUDA random
numbers the step uses; on the CPU it would shift the stream, so the constant keeps both sides' draws equal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
from torch import nn
from torch.distributions import Categorical

# utils.py L22-28: std 1, mean 0, so epsilons are plain pixel units and the box is [0, 1].
mu = torch.tensor((0.0, 0.0, 0.0)).view(3, 1, 1)
std = torch.tensor((1.0, 1.0, 1.0)).view(3, 1, 1)
upper_limit = (1 - mu) / std
lower_limit = (0 - mu) / std


@dataclass
class Args:
    """The command-line arguments the step reads (L21-69), README L12 candidates by default."""

    attack_types: list = field(default_factory=lambda: ["IFGSM"])
    epsilon_types: list = field(default_factory=lambda: list(range(3, 16)))
    attack_iters_types: list = field(default_factory=lambda: list(range(3, 15)))
    step_size_types: list = field(default_factory=lambda: list(range(1, 6)))
    factor: float = 0.7
    num_classes: int = 10
    a: float = 1.0
    b: float = 1.0
    c: float = 1.0
    R2_param: float = 4.0
    R3_param: float = 2.0
    clip_grad_norm: float = 1.0
    # attack_pgd's settings in Get_reward (L384-386)
    pgd_iters: int = 10
    pgd_restarts: int = 2


def clamp(X, lower_limit, upper_limit):
    """utils.py L30-31."""
    return torch.max(torch.min(X, upper_limit), lower_limit)


def _label_smoothing(label, factor, num_classes):
    """L89-94 (np.eye(10) / 10 - 1; the CIFAR-100 script has 100)."""
    one_hot = np.eye(num_classes)[label.data.cpu().numpy()]
    result = one_hot * factor + (one_hot - 1.0) * ((factor - 1) / float(num_classes - 1))
    return result


def LabelSmoothLoss(input, target):  # noqa: N802 (the authors' name)
    """L97-100."""
    log_prob = F.log_softmax(input, dim=-1)
    loss = (-target * log_prob).sum(dim=-1).mean()
    return loss


def _get_all_policies(attack_id_list, espilon_id_list, attack_iters_id_list, step_size_id_list, args):
    """L153-178."""
    policies = []
    attack_id_list = attack_id_list[0].cpu().numpy()
    espilon_id_list = espilon_id_list[0].cpu().numpy()
    attack_iters_id_list = attack_iters_id_list[0].cpu().numpy()
    step_size_id_list = step_size_id_list[0].cpu().numpy()
    for n in range(len(attack_id_list)):
        sub_policy = {}
        all_policy = {}
        all_policy["attack"] = args.attack_types[attack_id_list[n]]
        all_policy["epsilon"] = args.epsilon_types[espilon_id_list[n]]
        all_policy["attack_iters"] = args.attack_iters_types[attack_iters_id_list[n]]
        all_policy["step_size"] = args.step_size_types[step_size_id_list[n]]
        sub_policy[n] = all_policy
        policies.append(sub_policy)
    return policies


def select_action(policy_model, state, args):
    """L183-237 (the unused argmax policy kept: it draws no random numbers)."""
    outputs = policy_model(state)
    attack_id_list, espilon_id_list, attack_iters_id_list, step_size_id_list = [], [], [], []
    prob_list, action_list = [], []
    max_attack_id_list, max_espilon_id_list, max_attack_iters_id_list, max_step_size_id_list = [], [], [], []
    temp_saved_log_probs = []
    for id in range(4):
        logits = outputs[id]
        probs = F.softmax(logits, dim=-1)
        max_probs = probs.data.clone()
        m = Categorical(probs)
        prob_list.append(m)
        action = m.sample()
        max_action = max_probs.max(1)[1]
        mode = id % 5
        if mode == 0:
            attack_id_list.append(action)
            max_attack_id_list.append(max_action)
        elif mode == 1:
            espilon_id_list.append(action)
            max_espilon_id_list.append(max_action)
        elif mode == 2:
            attack_iters_id_list.append(action)
            max_attack_iters_id_list.append(max_action)
        elif mode == 3:
            step_size_id_list.append(action)
            max_step_size_id_list.append(max_action)
        temp_saved_log_probs.append(m.log_prob(action))
    curpolicy = _get_all_policies(
        attack_id_list, espilon_id_list, attack_iters_id_list, step_size_id_list, args
    )
    max_curpolicy = _get_all_policies(
        max_attack_id_list, max_espilon_id_list, max_attack_iters_id_list, max_step_size_id_list, args
    )
    action_list.append(attack_id_list)
    action_list.append(espilon_id_list)
    action_list.append(attack_iters_id_list)
    action_list.append(step_size_id_list)
    return action_list, curpolicy, prob_list, max_curpolicy


def attack_pgd(model, X, y, epsilon, alpha, attack_iters, restarts):
    """L240-266."""
    max_loss = torch.zeros(y.shape[0])
    max_delta = torch.zeros_like(X)
    for _zz in range(restarts):
        delta = torch.zeros_like(X)
        for i in range(len(epsilon)):
            delta[:, i, :, :].uniform_(-epsilon[i][0][0].item(), epsilon[i][0][0].item())
        delta.data = clamp(delta, lower_limit - X, upper_limit - X)
        delta.requires_grad = True
        for _ in range(attack_iters):
            output = model(X + delta)
            index = torch.where(output.max(1)[1] == y)
            if len(index[0]) == 0:
                break
            loss = F.cross_entropy(output, y)
            loss.backward()
            grad = delta.grad.detach()
            d = delta[index[0], :, :, :]
            g = grad[index[0], :, :, :]
            d = clamp(d + alpha * torch.sign(g), -epsilon, epsilon)
            d = clamp(d, lower_limit - X[index[0], :, :, :], upper_limit - X[index[0], :, :, :])
            delta.data[index[0], :, :, :] = d
            delta.grad.zero_()
        all_loss = F.cross_entropy(model(X + delta), y, reduction="none").detach()
        max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
        max_loss = torch.max(max_loss, all_loss)
    return max_delta


def train_target_model(input_batch, y_batch, copy_target_model, target_lr, args):
    """L269-280; ``target_lr`` is ``target_model_scheduler.get_lr()[0]``."""
    X, Y = input_batch, y_batch
    label_smoothing = torch.tensor(_label_smoothing(Y, args.factor, args.num_classes))
    optimizer = optim.SGD(copy_target_model.parameters(), lr=target_lr, momentum=0.9, weight_decay=5e-4)
    copy_target_model.train()
    optimizer.zero_grad()
    target_output = copy_target_model(X)
    copy_target_loss = LabelSmoothLoss(target_output, label_smoothing.float())
    copy_target_loss.backward()
    optimizer.step()
    return copy_target_model


def Attack_policy_batch(input_batch, y_batch, target_model, policies):  # noqa: N802
    """L312-357 (``torch.randint(k, k + 1, (3, 1, 1))`` as the constant k; see the module docstring)."""
    criterion = nn.CrossEntropyLoss()
    X, y = input_batch, y_batch
    delta_batch = torch.zeros_like(X)
    init_epsilon = (8 / 255.0) / std
    for i in range(len(init_epsilon)):
        delta_batch[:, i, :, :].uniform_(-init_epsilon[i][0][0].item(), init_epsilon[i][0][0].item())
    delta_batch.data = clamp(delta_batch, lower_limit - X, upper_limit - X)
    delta_batch.requires_grad = True
    alpha_batch = []
    epsilon_batch = []
    attack_iters_batch = []
    for ii in range(len(policies)):
        epsilon = (policies[ii][ii]["epsilon"] / 255.0) / std
        epsilon_batch.append(epsilon.cpu().numpy())
        alpha = (policies[ii][ii]["step_size"] / 255.0) / std
        alpha_batch.append(alpha.cpu().numpy())
        attack_iters = policies[ii][ii]["attack_iters"]
        temp_batch = torch.full((3, 1, 1), attack_iters, dtype=torch.long)
        attack_iters_batch.append(temp_batch.cpu().numpy())
    alpha_batch = torch.from_numpy(np.array(alpha_batch))
    epsilon_batch = torch.from_numpy(np.array(epsilon_batch))
    attack_iters_batch = torch.from_numpy(np.array(attack_iters_batch))
    max_attack_iters = torch.max(attack_iters_batch).cpu().numpy()
    for _ in range(max_attack_iters):
        mask_bacth = attack_iters_batch.ge(1).float()
        output = target_model(X + delta_batch)
        loss = criterion(output, y)
        loss.backward()
        grad = delta_batch.grad.detach()
        delta_batch.data = clamp(
            delta_batch + mask_bacth * alpha_batch * torch.sign(grad), -epsilon_batch, epsilon_batch
        )
        delta_batch.data = clamp(delta_batch, lower_limit - X, upper_limit - X)
        attack_iters_batch = attack_iters_batch - 1
        delta_batch.grad.zero_()
    delta_batch = delta_batch.detach()
    return delta_batch


def Get_delta(input_batch, y_batch, target_model, action):  # noqa: N802
    """L358-362."""
    target_model.eval()
    inputs = input_batch
    delta = Attack_policy_batch(input_batch, y_batch, target_model, action)
    return inputs + delta


def Get_reward(input_batch, y_batch, target_model, action, target_lr, args):  # noqa: N802
    """L364-411."""
    target_model.eval()
    criterion = nn.CrossEntropyLoss()
    inputs, targets = input_batch, y_batch
    delta = Attack_policy_batch(input_batch, y_batch, target_model, action)
    with torch.no_grad():
        ori_clean_output = target_model(inputs)  # noqa: F841 (computed and unused, as in the code)
        output = target_model(inputs + delta)
    R1 = criterion(output, targets)
    R1 = torch.clamp(R1, 0, 10)
    copy_target_model = copy.deepcopy(target_model)
    copy_target_model.train()
    copy_target_model = train_target_model(inputs + delta, targets, copy_target_model, target_lr, args)
    epsilon = (8 / 255.0) / std
    alpha = (2 / 255.0) / std
    pgd_delta = attack_pgd(
        copy_target_model, inputs, targets, epsilon, alpha, args.pgd_iters, args.pgd_restarts
    )
    copy_target_model.eval()
    with torch.no_grad():
        R2_output = copy_target_model(inputs + pgd_delta)
        clean_output = copy_target_model(inputs)
    R2 = (R2_output.max(1)[1] == targets).sum().item()
    R3 = (clean_output.max(1)[1] == targets).sum().item()
    test_n = targets.size(0)
    R2 = (R2) / test_n * args.R2_param
    R3 = (R3) / test_n * args.R3_param
    R2 = torch.clamp(torch.tensor(R2), -10, 10)
    R3 = torch.clamp(torch.tensor(R3), -10, 10)
    return (args.a * R1 + args.b * R2 + args.c * R3), R1, R2, R3, inputs + delta


def strategy_step(Strategy_model, policy_optimizer, target_model, inputs, targets, target_lr, args):  # noqa: N803
    """The policy update of ``train`` (L607-634), scheduler step left out; returns the loss and rewards."""
    pocliy_inputs = inputs.clone()
    Strategy_model.train()
    action_list, policy_outputs, policy_prob, max_policy_outputs = select_action(
        Strategy_model, pocliy_inputs, args
    )
    reward, R1, R2, R3, adv_examples = Get_reward(
        pocliy_inputs, targets, target_model, policy_outputs, target_lr, args
    )
    log_probs = []
    policy_loss = []
    for j in range(4):
        log_probs.append(policy_prob[j].log_prob(action_list[j][0]))
        policy_loss.append(-log_probs[j] * reward)
    policy_loss = (
        policy_loss[0].mean() + policy_loss[1].mean() + policy_loss[2].mean() + policy_loss[3].mean()
    )
    policy_optimizer.zero_grad()
    policy_loss.backward()
    torch.nn.utils.clip_grad_norm_(Strategy_model.parameters(), args.clip_grad_norm)
    policy_optimizer.step()
    return policy_loss, reward, R1, R2, R3


def target_step(Strategy_model, target_model, target_model_optimizer, inputs, targets, args):  # noqa: N803
    """The target update of ``train`` (L641-667), scheduler step left out; returns the loss."""
    pocliy_inputs1 = inputs.clone()
    Strategy_model.eval()
    action_list, policy_outputs, policy_prob, max_policy_outputs = select_action(
        Strategy_model, pocliy_inputs1, args
    )
    adv_examples = Get_delta(pocliy_inputs1, targets, target_model, policy_outputs)
    target_model.train()
    target_model.zero_grad()
    label_smoothing = torch.tensor(_label_smoothing(targets, args.factor, args.num_classes))
    target_output = target_model(adv_examples)
    target_loss = LabelSmoothLoss(target_output, label_smoothing.float())
    target_model_optimizer.zero_grad()
    target_loss.backward()
    target_model_optimizer.step()
    return target_loss
