from setuptools import setup

setup(
    name='gru4rec',
    version='0.1.0',
    description='GRU4Rec: session-based recommendations with recurrent neural networks, on PyTensor',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    py_modules=['atomicfile', 'modelfile', 'sessions', 'cbackend', 'backends', 'evaluation', 'training', 'losses',
                'network', 'hyperparams', 'recommend', 'gru4rec', 'baselines', 'synthetic', 'sessionstore',
                'itemindex', 'live', 'serve', 'run', 'paropt'],
    # The C of cbackend.py's kernels: data files that an installed cbackend reads beside itself.
    packages=['cbackend_kernels'],
    package_data={'cbackend_kernels': ['*.c']},
    entry_points={'console_scripts': ['gru4rec=run:main', 'gru4rec-paropt=paropt:main']},
    install_requires=[
        # What CI tests. cbackend.py's C kernels rest on PyTensor internals that it probes (missing_internals);
        # where they differ, as in PyTensor 3.3, GRU4Rec warns once and trains the plain graphs.
        'pytensor>=3.0.7,<3.1',
        # compiled host loops: the training step's distinct rows, live top-k. At most PyTensor 3.0's own bound: with
        # only a lower bound pip first takes the newest numba and then backtracks through numpy and pandas for
        # many minutes in a fresh virtual environment.
        'numba>=0.57,<=0.65.1',
        'numpy>=1.26',
        'pandas>=2.0',
        'tqdm>=4.60',
        'scipy>=1.10',
        'scipy-openblas32>=0.3.27',  # BLAS for the C backend (see cbackend.py)
    ],
    extras_require={
        'parquet': ['pyarrow>=12'],
        'jax': ['jax>=0.4.30'],
        'paropt': ['optuna>=4.9', 'psycopg2-binary>=2.9'],
        'serve': ['fastapi>=0.110', 'uvicorn[standard]>=0.29'],  # standard: httptools and uvloop
        # live session states in Redis (gru4rec serve --state-store redis://...); hiredis parses its replies fast
        'redis': ['redis>=5.0', 'hiredis>=2.0'],
        # the approximate top k of live sessions on large catalogues (itemindex.py, serve --index)
        'index': ['faiss-cpu>=1.8'],
        'lint': ['ruff>=0.6'],
        'test': ['pytest>=7', 'hypothesis>=6.0', 'scikit-learn>=1.3', 'pyarrow>=12', 'optuna>=4.9',
                 'psycopg2-binary>=2.9',
                 'nbclient>=0.7', 'nbformat>=5.7', 'ipykernel>=6', 'matplotlib>=3.7',
                 'fastapi>=0.110', 'uvicorn[standard]>=0.29', 'httpx>=0.27', 'schemathesis>=4.0', 'redis>=5.0',
                 'hiredis>=2.0', 'faiss-cpu>=1.8'],
    },
)
