"""``gpuconv train``: what weight sharing and local connections do to *learning*.

The lecture note the project started from counts parameters: a fully connected layer on a
500 x 500 image with 10^5 neurons has 2.5 x 10^10 weights, a locally connected one 10^7, a
shared convolution 100 per feature. ``gpuconv params`` prints those numbers and ``gpuconv
bench`` times the layers; this module trains the note's network three ways (and at three
points between the first two) on real data that ships with scikit-learn and reports
parameters, time per epoch and test accuracy:

- ``shared``: the note's network with :class:`gpuconv.torch.Conv2d`::

      input -> conv k1 x k1 x C x 10 -> ReLU -> conv k2 x k2 x 10 x 5 -> ReLU -> flatten
            -> fully connected to the labels

- ``blocks-2x2``, ``periodic-2x2``, ``blocks-4x4``: points on the sharing dial between the
  two (:data:`.models.DIAL`), both conv layers :class:`gpuconv.torch.TiledConv2d` with 2 x 2
  or 4 x 4 kernel slots per map, each slot shared by a block of the map (``blocks``) or by
  every second position (``periodic``), with a bias per map and slot;
- ``unshared``: the same geometry with :class:`gpuconv.torch.LocallyConnected2d` (a kernel
  and a bias at every output position, in both conv layers);
- ``dense``: the first layer fully connected (every one of its neurons sees the whole image;
  it still produces 10 maps of the first conv layer's size, one neuron each), then the
  unshared second layer: the network with neither idea in its first layer and no sharing
  anywhere. When its first layer would not fit in memory, the run says what it would need
  (the note's arithmetic: inputs x neurons weights) instead of training it.

The ReLUs are ours (the note names none; they add no parameters). The last layer has one
output per label of the dataset.

Datasets (scikit-learn's bundled data; nothing is downloaded):

- ``sample-images``: :func:`sklearn.datasets.load_sample_images` (two 427 x 640 RGB photos).
  2 labels: which photo a random 20 x 20 crop comes from. Each photo is cut into a 4 x 5 grid
  of tiles; per seed the tiles are dealt to train, validation and test, and every crop lies
  inside one tile, so no test pixel is ever seen in training. Crops sit at random positions:
  the same texture appears anywhere in the crop, the situation weight sharing is made for.
  The note's network exactly (5 x 5 x 3 x 10, then 3 x 3 x 10 x 5): 20 -> 16 -> 14, a flatten
  of 14 x 14 x 5 = 980 values (the note's illustrative 1024 is not a multiple of 5 maps).
- ``digits``: :func:`sklearn.datasets.load_digits` (1,797 aligned 8 x 8 grey digits,
  10 labels): every digit is centred and size-normalised, the situation locally connected
  layers were made for (DeepFace). A 5 x 5 kernel would cover most of an 8 x 8 image, so both
  kernels are 3 x 3: 8 -> 6 -> 4, a flatten of 4 x 4 x 5 = 80 values; one input channel.

Per seed the data are split once (stratified): test, validation (carved from the training
part) and training. The hyper-parameters (Adam, learning rate, epochs, batch) were chosen on
the validation accuracy; the test set only reports. Test accuracy is also recorded after
every epoch for the learning curves; nothing reads it to decide anything.

The parameter count of every network is computed twice, from the built PyTorch modules and
from :mod:`gpuconv.params` (:class:`~gpuconv.params.ParamCount` of each layer for the same
geometry), and the two must agree.

The modules: :mod:`.models` (the networks and their parameter counts), :mod:`.data`,
:mod:`.loop` (how it trains: :func:`train`, the runs, as a dict ``{"machine": ...,
"records": [...]}``), :mod:`.report` (:func:`format_tables`, :func:`plot`) and
:mod:`.command` (:func:`add_arguments` and :func:`run`, the command). This package names
their public pieces; importing it imports neither PyTorch nor scikit-learn nor matplotlib.
"""

from .command import DESCRIPTION, add_arguments, run
from .data import load_data
from .loop import PLANS, train
from .models import (DATASETS, DIAL, VARIANTS, Network, build_model, checked_params,
                     count_params, dense_requirement, dial_point, expected_params, network)
from .report import format_tables, plot, sharing_curve

__all__ = ["DATASETS", "VARIANTS", "PLANS", "Network", "network", "expected_params",
           "build_model", "count_params", "checked_params", "load_data", "dense_requirement",
           "train", "format_tables", "plot", "sharing_curve", "DESCRIPTION", "add_arguments",
           "run", "DIAL", "dial_point"]
